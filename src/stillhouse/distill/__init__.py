"""Distill: harvest → export → curate → train → eval, each a CLI verb over a run directory."""
