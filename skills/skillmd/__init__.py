"""The skill library as SKILL.md folders (the Agent Skills layout of published skill libraries
and of the published MetaClaw): one document read and written (``document``), archives and
folders read and written with the files beside each SKILL.md (``archive``), a library imported
file by file as proposed revisions and exported as it stands (``services``), from the API
(``api``) and from ``manage.py import_skills`` / ``export_skills``.

Imports the library (it proposes through the library's services) and the versions' models.
"""
