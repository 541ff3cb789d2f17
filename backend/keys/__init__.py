"""Signing-key management: the key store, its life cycle, key rotation and the ``keys`` CLI.

``store`` keeps Ed25519 keys in files behind the ``KeyStore`` interface (an HSM or KMS can
implement it later, DESIGN §7); ``rotation`` plans the signed key-change messages that move
meters from one key to the next (SPEC.md §2.4); ``cli`` is ``voltcredit keys``.
"""
