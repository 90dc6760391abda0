"""A small trained reasoning model for pfengine's demo and tests: a synthetic multi-step arithmetic
task with programmatically checkable steps (:mod:`pfengine.toy.task`), its tokenizer, a training
script for the policy, a value head and a separate PRM (:mod:`pfengine.toy.train`), their
evaluation (:mod:`pfengine.toy.prm_eval`) and the trained checkpoints (``checkpoints/``)."""
