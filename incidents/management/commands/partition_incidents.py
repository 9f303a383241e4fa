from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from incidents.partitions import PartitioningUnavailable, incidents_partition


class Command(BaseCommand):
    help = (
        "Partition the incidents table by month of arrival (PostgreSQL), keeping every row; "
        "on a partitioned table, make the months ahead. docs/deploy.md says when."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--months-ahead", type=int, default=3, help="months made beyond this one (default 3)"
        )

    def handle(self, *args, months_ahead: int, **options):
        if months_ahead < 0:
            raise CommandError("--months-ahead must be 0 or more.")
        try:
            done = incidents_partition(months_ahead=months_ahead)
        except PartitioningUnavailable as exc:
            raise CommandError(str(exc)) from exc
        if done["converted"]:
            self.stdout.write(
                f"Partitioned the incidents table: its {done['rows']} rows kept where they are, "
                f"in {done['made'][0]}."
            )
        else:
            self.stdout.write("The incidents table was partitioned already.")
        made = ", ".join(done["made"]) or "none"
        self.stdout.write(f"Partitions made: {made}.")
