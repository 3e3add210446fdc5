"""Dataset folders, preprocessing and phantoms."""
