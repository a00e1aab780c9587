"""``mergecore bench``: roofs, kernel throughput, end-to-end merges and the 70B projection.

Modules, one job each:

- :mod:`.timing`: clocks, CUDA synchronisation, the machine's and the commit's names;
- :mod:`.roofs`: memcpy, file read/write (cold and warm) and CUDA H2D/D2H/D2D bandwidths;
- :mod:`.kernels`: every merge kernel's GB/s per backend next to torch eager (and mergekit);
- :mod:`.shapes`: the LLaMA presets, their tensor shapes and byte counts;
- :mod:`.e2e`: an end-to-end merge of a generated family with per-stage times (and mergekit);
- :mod:`.projection`: projecting a full-depth merge from a few measured layers;
- :mod:`.report`: the terminal table, the JSON file and the PNG chart;
- :mod:`.command`: the command line.

The scripts in the repository's ``bench/`` are thin wrappers over these modules.
"""
