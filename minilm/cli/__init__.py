"""The command lines: argument parsing and one-line errors at the edge; each imports the library,
never the reverse. Console scripts point at each module's entry()."""
