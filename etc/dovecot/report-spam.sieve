# Moved into Junk: policyd learns the message as spam, reported by the IMAP user.
require ["vnd.dovecot.pipe", "copy", "imapsieve", "environment", "variables"];

if environment :matches "imap.user" "*" {
  set "user" "${1}";
}

pipe :copy "policyd-learn" ["spam", "${user}"];
