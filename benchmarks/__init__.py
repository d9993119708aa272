"""The hms-ach benchmark suite: ``python -m benchmarks [--quick | --smoke]`` or ``hms-ach bench``.

Every figure is measured several times and printed next to a ceiling or peer measured in the same
run, with the ratio between them. The engine is started as a user starts it (``hms-ach run`` on a
temporary database) and driven over loopback sockets from separate processes.

Modules:

* :mod:`benchmarks.data`: seeded generator of HL7 v2 messages and FHIR-shaped records;
* :mod:`benchmarks.stats`: medians, percentiles, summaries;
* :mod:`benchmarks.procs`: starting and stopping the engine and helper processes, RSS sampling;
* :mod:`benchmarks.mllp_load` / :mod:`benchmarks.http_load`: the load drivers (run as subprocesses),
  with what they share in :mod:`benchmarks.driver` (start together, one deadline, one JSON result);
* :mod:`benchmarks.sftp_server`: the SFTP server of figure D (on :mod:`hms_ach.devtools.sftp_server`);
* :mod:`benchmarks.echo_server` / :mod:`benchmarks.http_echo`: the socket and HTTP ceilings;
* :mod:`benchmarks.bulk_load`: fills a store directly for the FHIR API figures;
* :mod:`benchmarks.figures`: figures A to F; :mod:`benchmarks.report`: the table, the JSON file
  and the README table.
"""
