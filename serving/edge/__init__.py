"""Search with no network: one bundle file holding a release's codes and its query encoders, searched on a
laptop or a single-board computer with numpy, onnxruntime and tokenizers alone.

- ``container``: the file itself (a zip of stored, 64-byte aligned members and a manifest of their sha256);
- ``collection``: one collection's codes and columns, memory-mapped, ranked by popcount;
- ``searcher``: ``EdgeSearcher``, the service's text and image searches over a bundle, answered as it answers;
- ``http`` and ``cli``: the ``terrahash-edge`` command and its local HTTP server;
- ``build``: writing a bundle from a release (the only module here that needs the service's index code).
"""
