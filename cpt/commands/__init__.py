"""One module per `cpt` sub-command; each exposes main(argv) -> exit code."""
