"""The web pages' words in French."""

from __future__ import annotations

TEXTS: dict[str, str] = {
    # --- every page
    "error.title": "Une erreur s'est produite",
    "error.internal": "policyd n'a pas pu le faire pour l'instant. Merci de réessayer dans quelques "
    "minutes, ou de vous adresser à vos administrateurs.",
    "busy.title": "Service momentanément indisponible",
    "busy": "Merci de réessayer dans quelques minutes.",
    "notfound.title": "Page introuvable",
    "notfound": "Il n'y a pas de page à cette adresse.",
    "index.exemption": "Demander une dérogation pour un envoi en nombre",
    "index.admin": "Demandes en attente (administrateurs)",
    "index.metrics": "Métriques",
    # --- the exemption request form
    "exemption.title": "Demander une dérogation pour un envoi en nombre",
    "exemption.intro": "Chaque compte peut écrire à au plus {limit} destinataires extérieurs par heure. "
    "Pour une occasion qui en demande davantage, décrivez-la ci-dessous ; un administrateur accepte "
    "ou refuse chaque demande.",
    "exemption.claimed": "Cette page ne vérifie pas qui vous êtes : la demande est enregistrée comme "
    "envoyée depuis le web par une personne se présentant comme le compte que vous indiquez, et un "
    "administrateur la vérifie avant de l'accepter.",
    "exemption.user": "Vous êtes connecté en tant que {user} : la demande est enregistrée à votre nom.",
    "field.account": "Compte (l'identifiant qui enverra)",
    "field.organisation": "Organisation",
    "field.start": "Du (date et heure)",
    "field.end": "Au (date et heure)",
    "field.limit": "Destinataires extérieurs par heure nécessaires",
    "field.reason": "Motif professionnel",
    "hint.times": "Les heures sont celles du fuseau du serveur : {zone}.",
    "hint.limit": "Un message à 10 destinataires hors de l'organisation compte pour 10. Plus de {limit}, "
    "au plus {high}.",
    "hint.end": "Au plus {window} après le début.",
    "exemption.button": "Envoyer la demande",
    "exemption.invalid": "La demande n'a pas été envoyée : merci de corriger les champs signalés ci-dessous.",
    "exemption.expired": "Le formulaire a expiré ; merci de l'envoyer de nouveau.",
    "exemption.refused": "La demande n'a pas été enregistrée : {reason}",
    "invalid.required": "Merci de remplir ce champ.",
    "invalid.account": "Indiquez l'identifiant du compte, sans espace.",
    "invalid.when": "Indiquez une date et une heure.",
    "invalid.limit": "Indiquez un nombre entier de {low} à {high}.",
    "invalid.below": "Les comptes peuvent déjà écrire à {limit} destinataires extérieurs par heure : "
    "demandez davantage.",
    "invalid.order": "La fin doit être après le début.",
    "invalid.past": "Ce moment est déjà passé.",
    "invalid.long": "Une dérogation dure au plus {window}.",
    "received.title": "Demande reçue",
    "received": "Votre demande pour {account} ({limit} destinataires extérieurs par heure, du {start} "
    "au {end}) est enregistrée : un administrateur va l'examiner.",
    "toomany.title": "Trop de demandes",
    "toomany": "Ce formulaire a été envoyé trop de fois depuis votre réseau en peu de temps. Rien n'a "
    "été enregistré. Merci de réessayer dans {wait}, ou de vous adresser à votre assistance.",
    # --- the admin page
    "admin.title": "Demandes de dérogation en attente",
    "admin.challenge": "Le jeton d'administration est nécessaire (n'importe quel nom d'utilisateur, "
    "le jeton comme mot de passe).",
    "admin.as.claimed": "Vous agissez avec le jeton d'administration sous le nom « {user} » : ce nom "
    "n'est pas vérifié, et le journal d'audit enregistre vos décisions comme « {who} ».",
    "admin.as.user": "Vous êtes connecté en tant que {user} : le journal d'audit enregistre vos "
    "décisions comme « {who} ».",
    "admin.claims": "« web, claiming … » signifie que le formulaire a été envoyé par une personne qui a "
    "indiqué ce compte : personne n'a vérifié qu'elle en était titulaire.",
    "admin.none": "Aucune demande en attente.",
    "admin.caption": "Demandes en attente de décision",
    "admin.id": "N°",
    "admin.account": "Compte",
    "admin.limit": "Destinataires par heure",
    "admin.window": "Période",
    "admin.reason": "Motif",
    "admin.by": "Demandé par",
    "admin.decision": "Décision",
    "admin.note": "Note sur la demande n° {id}",
    "admin.approve": "Accepter",
    "admin.deny": "Refuser",
    "admin.approve.label": "Accepter la demande n° {id} ({account})",
    "admin.deny.label": "Refuser la demande n° {id} ({account})",
    "admin.done": "Demande {id} pour {account} : {status}.",
    "admin.failed": "Rien n'a été modifié : {reason}",
    "admin.expired": "La page avait expiré ; rien n'a été modifié.",
    "admin.foreign": "Cette demande vient d'un autre site ; rien n'a été modifié.",
    "status.approved": "acceptée",
    "status.denied": "refusée",
    "status.revoked": "révoquée",
    "status.pending": "en attente",
    "status.expired": "expirée",
    "refusal.unknown": "il n'y a pas de demande n° {id}.",
    "refusal.already": "la demande n° {id} est déjà {state}.",
    "refusal.not": "la demande n° {id} est {state}, et non {wanted}.",
    "refusal.ended": "la période de la demande n° {id} est déjà passée.",
    "refusal.overlap": "{account} a déjà une dérogation acceptée sur cette période (demande n° {other}).",
    # --- self-service: release
    "release.title": "Un message retenu pour vous",
    "release.intro": "Ce message adressé à {recipient} a été reconnu comme spam (score {score}) "
    "et gardé en quarantaine le {held}. Vérifiez qui l'a envoyé avant de le libérer : il "
    "sera distribué dans votre boîte de réception, son objet commençant par {tag}.",
    "release.button": "Le distribuer dans ma boîte",
    "release.done.title": "Message libéré",
    "release.done": "Le message est en route vers votre boîte de réception ({recipient}), "
    "son objet commençant par {tag}.",
    "release.gone.title": "Ce message n'est plus en quarantaine",
    "release.gone": "Il a déjà été libéré, supprimé, ou gardé plus de {retention}. Rien n'a été modifié.",
    "release.failed.title": "Pas encore distribué",
    "release.failed": "Le service de messagerie n'a pas pris le message pour l'instant ; il est "
    "toujours en quarantaine. Merci d'appuyer de nouveau sur le bouton dans quelques minutes.",
    "headers.envelope": "Expéditeur (enveloppe)",
    "headers.held": "Retenu le",
    "headers.expires": "Supprimé le",
    "headers.all": "Tous les en-têtes",
    "headers.caption": "En-têtes du message retenu",
    # --- self-service: preference
    "preference.link": "Choisir ce que deviennent vos spams",
    "preference.title": "Spam : boîte de réception ou quarantaine",
    "preference.now": "Pour {address}, le courrier reconnu comme spam est actuellement : {choice} ({source}).",
    "preference.legend": "Le courrier reconnu comme spam doit être",
    "preference.inbox": "distribué dans ma boîte de réception, son objet commençant par {tag}",
    "preference.quarantine": "gardé en quarantaine ; un récapitulatif quotidien le liste et je "
    "libère ce que je veux",
    "preference.button": "Enregistrer",
    "preference.saved": "Enregistré : pour {address}, le spam est désormais {choice}.",
    "choice.inbox": "distribué dans la boîte, marqué",
    "choice.quarantine": "gardé en quarantaine",
    "source.own": "votre choix",
    "source.provisioned": "réglé pour votre compte par votre organisation",
    "source.default": "le réglage par défaut du service",
    "invalid.title": "Ce lien n'est pas valide",
    "invalid": "Il a peut-être été copié incomplètement ou modifié. Rien n'a été modifié. "
    "Utilisez tel quel le lien de votre dernier récapitulatif de quarantaine.",
    "expired.title": "Ce lien a expiré",
    "expired": "Les liens d'un récapitulatif de quarantaine fonctionnent pendant {ttl}. Rien n'a "
    "été modifié. Le prochain récapitulatif contient de nouveaux liens.",
    "form.expired": "La page avait expiré ; rien n'a été modifié. Merci d'appuyer de nouveau sur le bouton.",
    "bad.choice": "Merci de choisir l'une des deux options.",
}
