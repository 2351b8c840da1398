"""The retrained class-wise heads and the pure CRAT maths beside them.

The fine-tune config (:mod:`~crat_ft.heads.ft_config`), CRAT (:mod:`~crat_ft.heads.transfusion`, pure
tensors), the heads retrained from the cache (:mod:`~crat_ft.heads.classwise`), their losses
(:mod:`~crat_ft.heads.losses`), samplers (:mod:`~crat_ft.heads.sampling`) and hooks
(:mod:`~crat_ft.heads.hooks`); CRAT in mmdet's own training (:mod:`~crat_ft.heads.plugin`); the heads
merged back into a detector checkpoint (:mod:`~crat_ft.heads.export`); and :func:`register_all`'s one
place for everything crat-ft registers in mmdet (:mod:`~crat_ft.heads.registry`).
"""
