"""Evidence from a run's output: retention and tags (funnel), answer metrics, LLM judges.

Modules: rundir (read DIR), funnel (Tables 2 and 8), metrics (ROUGE, GLEU, lengths), semantic
(BERTScore, BLEURT), judges and judge_stats (Figs. 3 and 4), evaluate (eval.json), paper (the
paper's reference numbers).
"""
