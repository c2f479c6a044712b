"""Wire protocols: Postfix's policy delegation and milter protocols, and their connections."""
