"""The command-line shell: each command parses, builds a config, calls one library function, renders."""
