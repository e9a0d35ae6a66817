"""mode=compare: IDEAL against the baselines a reviewer asks for, at equal training tokens, with
paired statistics over seeds (issue 13)."""
