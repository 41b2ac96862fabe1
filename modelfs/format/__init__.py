"""What the bytes mean: chunking and chunk ids, the chunk codec, manifests, refs,
registry keys and encryption, signatures and trusted keys, pointer files, and what DVC
and Git LFS checkouts say about their files (``foreign``).

Owns every on-store and on-disk format and its validation (a malformed manifest, a
hostile path, a bad key are refused here, as one ``ModelfsError`` line). Pure: no
network, no cache, no trio; it reads only the files it is handed (keys, pointers).
May import: ``errors``, ``units`` and the libraries of formats (blake3, fastcdc,
zstandard, cryptography, model-signing, yaml). Imported by everything else.
"""
