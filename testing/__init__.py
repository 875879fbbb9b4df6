"""Helpers shared by the test suite (tests/) and the benchmarks (bench/).

- `stack` starts and stops a real `fastserve up`; `tiny_model` builds the small random-weight
  Llama both run against.
- `kvstore_process` starts the kvstore service as its own process; `redis_server` runs a
  throwaway redis-server.
- `local_pipeline` runs worker Executors in this process behind the interface the scheduler's
  engine drives (engine tests without processes).
- `scheduler_stats` reads the scheduler's Stats RPC by series name.

It holds no tests itself (pytest collects only tests/), and it is not part of the installed
package: import it from the repository root, as pytest and `python -m bench.x` do.
"""
