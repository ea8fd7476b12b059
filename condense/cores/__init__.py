"""Pure functions over numpy arrays: no Ray, no file I/O, no globals. GPU code takes `device`."""
