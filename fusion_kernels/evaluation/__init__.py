"""Scoring merged models in a sweep: the built-in lm-evaluation-harness scorer (language ability,
``--eval lm-eval:TASK[,TASK...]``), user scorers named ``MODULE:FUNCTION`` (visual ability or
anything else), the objective that combines their metrics (OA), and the LA-vs-VA trade-off plot and
page. Nothing here imports lm-eval or matplotlib until it is used.
"""
