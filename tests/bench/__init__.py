"""The benchmark (``make bench``): policyd against its floor and its peers."""
