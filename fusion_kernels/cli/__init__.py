"""Pieces of the command lines: the options every command shares (:mod:`.options`) and the
parts of the merge command (its parser, ``--config`` translation, dry-run printing)."""
