from django.urls import path

from incidents import views

app_name = "incidents"

urlpatterns = [
    path("onboarding/", views.onboarding, name="onboarding"),
    path("groups/", views.group_list, name="group_list"),
    path("groups/<int:group_id>/", views.group_detail, name="group_detail"),
    path("groups/<int:group_id>/status/", views.group_status, name="group_status"),
    path("groups/<int:group_id>/merge/", views.group_merge, name="group_merge"),
    path("groups/<int:group_id>/split/", views.group_split, name="group_split"),
    path("turns/", views.turn_list, name="turn_list"),
    path("turns/<uuid:turn_id>/", views.turn_detail, name="turn_detail"),
    path("abusive-sources/", views.abusive_source_mark, name="abusive_source_mark"),
    path(
        "abusive-sources/<int:mark_id>/unmark/",
        views.abusive_source_unmark,
        name="abusive_source_unmark",
    ),
]
