"""Everything condense keeps on disk: the run directory, atomic files, part files and their
records, completion marks, the run lock, scratch files and row-group reads. Nothing above this
floor opens a run directory's files itself."""
