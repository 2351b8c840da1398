"""crat-ft on mmengine: configs with strict ``--cfg-options`` (:mod:`~crat_ft.engine.config`), checkpoints
read through an allow-list (:mod:`~crat_ft.engine.checkpoint`) and helpers around mmengine's ``Runner``
(:mod:`~crat_ft.engine.runner`).
"""
