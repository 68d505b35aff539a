"""``he``: the data owner encrypts bounded per-row contributions, the gateway adds ciphertexts, a key holder
decrypts only the final totals and adds the planned noise.

- cube.py: the owner's step (bounding with the gateway's own per-row SQL, one-hot packing, encryption) and
  its proof note;
- scheme.py: BFV parameters, key files, batched ciphertext sums, the rotate-and-sum fold; no-wrap proof note;
- executor.py: the gateway's side; holder.py: the key holder process, its checks and proof note.

Threat model: docs/executors.md.
"""
