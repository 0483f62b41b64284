"""Live migration: the public API is :mod:`.migrate` (``migrate_out``, ``migrate_in``,
``MigrationOptions``, ...), the wire format :mod:`.stream`, the device state :mod:`.state`.

Inside: :mod:`.options` (tunables, hooks), :mod:`.blockers` (checked before anything stops),
:mod:`.pages` (memory: layout, pre-copy), :mod:`.source` and :mod:`.destination` (the two
sides, phase by phase), :mod:`.report` (what each side measured and confirmed),
:mod:`.channels` (sockets and files the stream runs over), :mod:`.cli` and :mod:`.harness`
(the ``shadowvmm migrate`` command and its test load).
"""
