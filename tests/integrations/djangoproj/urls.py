from django.urls import path

from . import views

urlpatterns = [
    path("purchase", views.purchase),
    path("purchase/rolled-back", views.purchase_rolled_back),
    path("purchase/delay-on-commit", views.purchase_delay_on_commit),
    path("purchase/batch-on-commit", views.purchase_batch_on_commit),
    path("purchase/rolled-back-on-commit", views.purchase_rolled_back_on_commit),
    path("purchases/on-commit", views.purchases_on_commit),
]
