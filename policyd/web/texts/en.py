"""The web pages' words in English."""

from __future__ import annotations

TEXTS: dict[str, str] = {
    # --- every page
    "error.title": "Something went wrong",
    "error.internal": "policyd could not do this just now. Please try again in a few minutes, "
    "or ask your administrators.",
    "busy.title": "Service briefly unavailable",
    "busy": "Please try again in a few minutes.",
    "notfound.title": "No such page",
    "notfound": "There is no page at this address.",
    "index.exemption": "Request a bulk-send exemption",
    "index.admin": "Pending requests (administrators)",
    "index.metrics": "Metrics",
    # --- the exemption request form
    "exemption.title": "Request a bulk-send exemption",
    "exemption.intro": "Each account may send mail to at most {limit} external recipients per hour. "
    "For one occasion that needs more, describe it below; an administrator approves or denies each request.",
    "exemption.claimed": "This page does not check who you are: the request is recorded as sent from the "
    "web by someone claiming to be the account you enter, and an administrator checks it before approving it.",
    "exemption.user": "You are signed in as {user}: the request is recorded as sent by you.",
    "field.account": "Account (the login that will send)",
    "field.organisation": "Organisation",
    "field.start": "From (date and time)",
    "field.end": "Until (date and time)",
    "field.limit": "External recipients per hour needed",
    "field.reason": "Business reason",
    "hint.times": "Times are in the server's time zone: {zone}.",
    "hint.limit": "A message to 10 recipients outside the organisation counts 10. More than {limit}, "
    "at most {high}.",
    "hint.end": "At most {window} after the start.",
    "exemption.button": "Send the request",
    "exemption.invalid": "The request was not sent: please correct the fields marked below.",
    "exemption.expired": "The form has expired; please send it again.",
    "exemption.refused": "The request was not recorded: {reason}",
    "invalid.required": "Please fill in this field.",
    "invalid.account": "Enter the login of the account, without spaces.",
    "invalid.when": "Enter a date and time.",
    "invalid.limit": "Enter a whole number from {low} to {high}.",
    "invalid.below": "Accounts may already send to {limit} external recipients per hour: ask for more than that.",
    "invalid.order": "The end must be after the start.",
    "invalid.past": "This time has already passed.",
    "invalid.long": "An exemption may last at most {window}.",
    "received.title": "Request received",
    "received": "Your request for {account} ({limit} external recipients per hour, {start} to {end}) "
    "is recorded: an administrator will review it.",
    "toomany.title": "Too many requests",
    "toomany": "This form was sent too many times from your network in a short while. Nothing was "
    "recorded. Please try again in {wait}, or ask your helpdesk.",
    # --- the admin page
    "admin.title": "Pending exemption requests",
    "admin.challenge": "The admin token is needed (any user name, the token as password).",
    "admin.as.claimed": "You act with the admin token under the name “{user}”: that name is not checked, "
    "and the audit log records your decisions as “{who}”.",
    "admin.as.user": "You are signed in as {user}: the audit log records your decisions as “{who}”.",
    "admin.claims": "“web, claiming …” means the form was sent by someone who gave that account: "
    "no one checked it was its owner.",
    "admin.none": "No pending request.",
    "admin.caption": "Requests waiting for a decision",
    "admin.id": "#",
    "admin.account": "Account",
    "admin.limit": "Recipients per hour",
    "admin.window": "Window",
    "admin.reason": "Reason",
    "admin.by": "Requested by",
    "admin.decision": "Decision",
    "admin.note": "Note on request #{id}",
    "admin.approve": "Approve",
    "admin.deny": "Deny",
    "admin.approve.label": "Approve request #{id} ({account})",
    "admin.deny.label": "Deny request #{id} ({account})",
    "admin.done": "Request {id} for {account}: {status}.",
    "admin.failed": "Nothing was changed: {reason}",
    "admin.expired": "The page had expired; nothing was changed.",
    "admin.foreign": "This request came from another site; nothing was changed.",
    "status.approved": "approved",
    "status.denied": "denied",
    "status.revoked": "revoked",
    "status.pending": "pending",
    # --- self-service: release
    "release.title": "A message held for you",
    "release.intro": "This message to {recipient} was recognised as spam (score {score}) and kept "
    "in quarantine on {held}. Check who sent it before you release it: it will be delivered "
    "to your inbox, its subject starting with {tag}.",
    "release.button": "Deliver it to my inbox",
    "release.done.title": "Message released",
    "release.done": "The message is on its way to your inbox ({recipient}), its subject starting with {tag}.",
    "release.gone.title": "This message is no longer in quarantine",
    "release.gone": "It was already released, deleted, or kept longer than {retention}. Nothing was changed.",
    "release.failed.title": "Not delivered yet",
    "release.failed": "The mail service did not take the message just now; it is still in "
    "quarantine. Please press the button again in a few minutes.",
    "headers.envelope": "Sender (envelope)",
    "headers.held": "Held on",
    "headers.expires": "Deleted on",
    "headers.all": "All headers",
    "headers.caption": "Headers of the held message",
    # --- self-service: preference
    "preference.link": "Choose what happens to your spam",
    "preference.title": "Spam: inbox or quarantine",
    "preference.now": "For {address}, mail recognised as spam is now: {choice} ({source}).",
    "preference.legend": "Mail recognised as spam should be",
    "preference.inbox": "delivered to my inbox, its subject starting with {tag}",
    "preference.quarantine": "kept in quarantine; a daily summary lists it and I release what I want",
    "preference.button": "Save",
    "preference.saved": "Saved: for {address}, spam is now {choice}.",
    "choice.inbox": "delivered to the inbox, tagged",
    "choice.quarantine": "kept in quarantine",
    "source.own": "your choice",
    "source.provisioned": "set for your account by your organisation",
    "source.default": "the service's default",
    "invalid.title": "This link is not valid",
    "invalid": "It may have been copied incompletely or changed. Nothing was changed. "
    "Use the link in your latest quarantine summary, as it is.",
    "expired.title": "This link has expired",
    "expired": "Links in a quarantine summary work for {ttl}. Nothing was changed. "
    "The next summary has new links.",
    "form.expired": "The page had expired; nothing was changed. Please press the button again.",
    "bad.choice": "Please choose one of the two options.",
}
