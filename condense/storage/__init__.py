"""Everything condense keeps on disk: the run directory, atomic files, part files and their
records, completion marks, the run lock, scratch files and row-group reads. Stages and the
pipeline read and write the run directory's Parquet and Arrow files only through here
(tests/test_layers.py checks it)."""
