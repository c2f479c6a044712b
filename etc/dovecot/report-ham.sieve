# Moved out of Junk: policyd learns the message as ham, reported by the IMAP
# user; a message thrown away (moved to Trash) teaches nothing.
require ["vnd.dovecot.pipe", "copy", "imapsieve", "environment", "variables"];

if environment :matches "imap.mailbox" "*" {
  set "mailbox" "${1}";
}
if string "${mailbox}" "Trash" {
  stop;
}

if environment :matches "imap.user" "*" {
  set "user" "${1}";
}

pipe :copy "policyd-learn" ["ham", "${user}"];
