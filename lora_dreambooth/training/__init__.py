"""Training: the recipe (`recipe.py`, setup -> loop -> save) and the components only training uses."""
