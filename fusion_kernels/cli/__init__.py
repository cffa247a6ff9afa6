"""The merge command's parts: its parser (:mod:`.merge_parser`), the parameters from its flags or
``--config`` (:mod:`.merge_params`) and ``--dry-run``'s printing (:mod:`.dry_run`). The options
every command shares are :mod:`fusion_kernels.options`."""
