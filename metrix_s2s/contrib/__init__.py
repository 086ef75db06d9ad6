"""Integrations with web frameworks and ORMs: the transactional outbox for Django
(:mod:`metrix_s2s.contrib.django`) and SQLAlchemy (:mod:`metrix_s2s.contrib.sqlalchemy`)."""
