"""Research code beside the engine, not part of it: :mod:`.miniature` trains, forgets and merges
the paper's experiment in miniature (it needs transformers, a test dependency); its parts are
:mod:`.spec`, :mod:`.text`, :mod:`.images` and :mod:`.training`."""
