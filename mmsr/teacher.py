"""Moved: the scripted teacher is ``mmsr.demo.teacher.RAGTeacher``."""

raise ImportError("mmsr.teacher moved to mmsr.demo.teacher (class_path: mmsr.demo.teacher.RAGTeacher)")
