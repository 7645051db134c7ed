"""The PostgreSQL schema's migrations, ``NNNN_name.sql``, applied in order by ``journal.migrate``."""
