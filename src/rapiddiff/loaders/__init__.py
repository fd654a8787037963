"""Loading weights that are not in Diffusers' folder layout."""
