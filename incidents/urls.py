from django.urls import path

from incidents import views

app_name = "incidents"

urlpatterns = [
    path("groups/", views.group_list, name="group_list"),
    path("groups/<int:group_id>/", views.group_detail, name="group_detail"),
    path("groups/<int:group_id>/status/", views.group_status, name="group_status"),
]
