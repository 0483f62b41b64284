"""``shadowvmm run``: the main job (:mod:`.run`) and its report (:mod:`.report`)."""
