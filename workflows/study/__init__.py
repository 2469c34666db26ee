"""What a study file means: its schema (validated before anything launches) and the grid of cells it expands to.
Imported by the driver and by workers; imports neither."""
