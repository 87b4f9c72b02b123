"""bnpipe.train stage."""
