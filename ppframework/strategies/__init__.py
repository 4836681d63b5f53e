"""Built-in strategies, one module per stage family; :mod:`.builtin` registers them all."""
