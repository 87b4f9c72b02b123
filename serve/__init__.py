"""bnpipe.serve stage."""
