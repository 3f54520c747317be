"""`hearth tune NAME`: measure this machine for one model (threads, batch size, parallel
sequences, context size) on its real backend, and write the best values into its YAML."""
