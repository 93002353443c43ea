"""One module per tab of the explorer; each has `render(...)`."""
