"""Data parallelism on Ray: K engines, each in its own Ray actor process, on one machine or many.

- :mod:`~pfengine.dp.cluster`: connecting to Ray (a local cluster, or ``--ray-address`` of one
  started with ``ray start``) and what each engine reserves;
- :mod:`~pfengine.dp.actor`: one engine in a Ray actor;
- :mod:`~pfengine.dp.pool`: K such actors behind the server's backend interface, routing requests,
  rerunning those of a replica that died while Ray restarts it (``pfengine serve --replicas K``);
- :mod:`~pfengine.dp.eval`: an evaluation's problems spread over the pool, the results merged into one
  results file (``pfengine eval --workers K``);
- :mod:`~pfengine.dp.front` and :mod:`~pfengine.dp.errors`: what crosses from the actors to the driver.

Ray is an optional extra (``pip install 'pfengine[ray]'``); nothing else in pfengine imports this package.
"""
