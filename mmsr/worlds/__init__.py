"""Moved: the demo's world (``mmsr.worlds.shapes``) is ``mmsr.demo.world``."""

raise ImportError("mmsr.worlds moved: mmsr.worlds.shapes is now mmsr.demo.world (build_world)")
