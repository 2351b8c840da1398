"""What the evaluations mean: bootstrap intervals (:mod:`~crat_ft.analysis.bootstrap`), two models compared
(:mod:`~crat_ft.analysis.compare`), error types (:mod:`~crat_ft.analysis.error_analysis`), Fisher diagnostics
(:mod:`~crat_ft.analysis.diagnostics`) and the rare-class gallery (:mod:`~crat_ft.analysis.gallery`).
"""
