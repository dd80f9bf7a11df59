"""Model helpers shared by the stage services (torch imported lazily by each module)."""
