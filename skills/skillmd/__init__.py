"""The skill library as SKILL.md folders (the format of published skill libraries and of the
published MetaClaw): parse and render one document, import a zip or a folder as proposed
revisions, export what stands for each skill (the revision in the active policy, else the newest
approved), from the API and from ``manage.py import_skills`` / ``export_skills``.

Imports the library (it proposes through the library's services) and the versions' models.
"""
