"""Content scoring: what the classifier sees of a message, the classifier, and the score."""
