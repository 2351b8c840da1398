"""The commands that run the pipeline, each joining the layers below it: extraction
(:mod:`~crat_ft.pipeline.extract`), retraining (:mod:`~crat_ft.pipeline.retrain`), training and
evaluating whole detectors (:mod:`~crat_ft.pipeline.stage1`), ablations (:mod:`~crat_ft.pipeline.ablate`)
and the demo (:mod:`~crat_ft.pipeline.demo`).
"""
