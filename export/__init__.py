"""bnpipe.export stage."""
